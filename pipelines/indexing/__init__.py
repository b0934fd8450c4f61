"""Pure building blocks of the nightly index job (validation, derivatives); no Ray imports."""
