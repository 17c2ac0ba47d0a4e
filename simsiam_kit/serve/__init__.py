"""``simsiam-kit serve``: nearest-neighbour image search over HTTP, with a web page.

A thin layer over the library functions ``search`` uses (DESIGN.md, habit 21): the index and its images
come from a :class:`~simsiam_kit.retrieval.gallery.Gallery` (the one adapter to the embedding-directory
format), the model runtime is passed in (the command passes ``export.OnnxEmbedder``).

* :mod:`simsiam_kit.serve.app`: ``create_app`` (FastAPI: endpoints, request bounds, the page) and
  ``ServeSettings``;
* :mod:`simsiam_kit.serve.batching`: ``DynamicBatcher`` (requests arriving together share one encoder
  call, bounded wait) and ``DirectCaller`` (one call per request);
* :mod:`simsiam_kit.serve.server`: ``run_server`` (open the directory and the model once, run uvicorn);
* ``static/``: the page (HTML, CSS, a little JavaScript; package data, no build step, no CDN).

FastAPI, uvicorn and python-multipart are the optional extra ``serve`` (``pip install -e '.[serve]'``);
only ``app`` and ``server`` import them, inside their functions.
"""
