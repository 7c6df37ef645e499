"""Argument types shared by the subcommand modules (argparse reports their errors as usage errors)."""

import argparse


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
