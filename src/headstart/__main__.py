"""``python -m headstart`` runs the CLI."""

from headstart.cli.main import entrypoint

if __name__ == "__main__":
    entrypoint()
