"""``python -m neon_cli`` (also what ``torchrun -m neon_cli`` runs)."""

from neon_cli.commands import main

if __name__ == "__main__":
    main()
