"""The ``prefect-eggapi`` command. Every argparse parser of the package lives in this package."""
