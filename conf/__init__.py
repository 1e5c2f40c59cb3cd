# Hydra configs of resexp. Installed as the package `resexp.conf` so that an installed
# wheel finds them (see pyproject.toml); this file only makes the folder a package.
