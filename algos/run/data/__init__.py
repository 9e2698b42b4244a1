"""The data registry: a name in ``data.name`` -> ``(train_dataloader, eval_dataloader)`` for the model built; one
module per kind of data (``images``, ``text``, ``span_corruption``, ``glue``, ``synthetic``; ``common`` holds what
they share).

Each builder gets the model's ``InputSpec`` (``spec``) besides its config keys. Offline: ``digits`` (images
shipped with scikit-learn), ``text_mlm``, ``span_corruption`` and ``sentences`` with their default corpus (Python's
own reference documentation, shipped with every Python), ``synthetic``. Needing the network or a local copy: ``cifar10``
(torchvision), ``imagenet`` (an image folder), ``glue`` and the text builders with ``dataset=`` (HF datasets).
"""

from algos.run.data import glue, images, span_corruption, synthetic, text  # noqa: F401  (each registers its builders)
from algos.run.data.common import DATA
from algos.run.data.images import digits_dataloaders
from algos.run.data.span_corruption import corrupt_spans
from algos.run.data.text import hf_dataset, hf_tokenizer, python_docs_corpus, split_sentences, word_piece_tokenizer

__all__ = ["DATA", "corrupt_spans", "digits_dataloaders", "hf_dataset", "hf_tokenizer", "python_docs_corpus",
           "split_sentences", "word_piece_tokenizer"]
