"""Writers of merged integer models, one module per output format."""
