"""Generated-code realisation: rewrite a family's transformers modeling source with libcst."""
