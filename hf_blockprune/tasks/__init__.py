"""Task helpers around the core: local-or-Hub task data, the embedded defaults (offline MiniLM, shared data),
question-answering post-processing and the `hf-blockprune` command line."""
