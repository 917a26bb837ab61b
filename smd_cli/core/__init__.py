"""What every layer uses: defaults, errors, reading files, writing outputs (docs/development.md#layout)."""
