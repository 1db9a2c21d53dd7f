"""roiscribe tests, mirroring the packages."""
