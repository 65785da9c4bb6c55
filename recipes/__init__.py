"""ouro.recipes: typed, versioned quantization recipes and the named presets (data under presets/)."""
