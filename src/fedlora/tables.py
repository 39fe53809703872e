"""Tables printed whole, in a terminal or not.

Rich fits a table to the console's width; with its output going to a file or a pipe (CI, nohup,
a scheduler) that width is a default 80 columns, and the table comes out squeezed, each number
cut to "0.29…". Outside a terminal a table is printed at its natural width instead.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

WIDEST = 1_000  # columns a table may take in a log


def print_table(console: Console, table: Table) -> None:
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(WIDEST), table).maximum
    # Console.print never goes past the console's width: a console as wide as the table
    wide = Console(file=console.file, width=max(natural, console.width), no_color=console.no_color)
    wide.print(table)
