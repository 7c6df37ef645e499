"""Everything that needs torch: the independent PyTorch implementation of inner looping
(:mod:`looped`), the Hugging Face reference model (:mod:`hf`) and the PyTorch scorer of the
evaluation (:mod:`hf_scorer`). Nothing outside this package (and the exporters) imports torch."""
