"""A finished run as a dataset: the index, its readers (``open_run``, public API), export, gallery, audit, estimates.

``from batchgen.dataset import open_run`` is the public entry point; the reader lives in ``batchgen.dataset.reader``.
"""

from batchgen.dataset.reader import Run, Video, open_run, sample_position

__all__ = ["Run", "Video", "open_run", "sample_position"]
