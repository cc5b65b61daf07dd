"""The model store and everything about GGUF files: names, metadata, Modelfiles, templates."""
