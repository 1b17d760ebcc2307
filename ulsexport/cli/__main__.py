"""`python -m ulsexport.cli`: the same command line as `ulsexport`."""
from . import main

if __name__ == "__main__":
    main(prog_name="ulsexport")
