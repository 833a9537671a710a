"""`python -m tfsft COMMAND ...`: the same as the `tfsft` console script."""

from tfsft.cli import main

if __name__ == "__main__":
    main()
