"""Finding passages: the chunk index, its in-memory copies (vectors, keywords), embedders, hybrid search."""
