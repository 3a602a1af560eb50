"""The scoring service (also the image's entrypoint): `ctr serve --model BUNDLE_DIR`."""
