"""``python -m bnfuse`` runs the CLI."""

from bnfuse.cli import main

if __name__ == "__main__":
    main()
