"""Names in pandas frames as categories.

The frames every analysis works on hold a few hundred distinct names (metrics, tests,
nodes, runs) over millions of rows. As categories, each row holds an integer code into
the names, so filtering or regrouping a frame copies codes, not strings. The categories
are kept sorted, so that sorting and grouping by a name orders as its text does.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd


def sorted_categories(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """`frame` with each of `columns` it holds as categories of its sorted names: text is
    converted, and existing categories are put in sorted order (pandas counts two
    unordered category dtypes with the same names equal, so `astype` would not reorder)."""
    converted = {}
    for column in columns:
        if column not in frame:
            continue
        values = frame[column]
        if not isinstance(values.dtype, pd.CategoricalDtype):
            converted[column] = values.astype("category")  # sorts its categories
        elif not values.cat.categories.is_monotonic_increasing:
            converted[column] = values.cat.reorder_categories(sorted(values.cat.categories))
    return frame.assign(**converted) if converted else frame
