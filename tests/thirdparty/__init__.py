"""Model code from elsewhere, vendored unmodified with its licence (one
folder per codebase), and the glue that runs it in the framework beside it.
See ``README.md`` here for where each file comes from."""
