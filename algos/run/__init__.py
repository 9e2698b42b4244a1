"""From configuration to a Composer Trainer: data, models and (with the recipe issue) the YAML runner."""
