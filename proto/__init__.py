"""The request plane's `.proto` definitions and their generated stubs (no hand-written logic).

Regenerate with `bash scripts/gen_proto.sh` after editing a `.proto` file.
"""
