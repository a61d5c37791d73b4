"""Self-distillation and head training: `dyntree distill` builds the data, `dyntree train` fits the heads."""
