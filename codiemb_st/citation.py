"""The CoDiEmb paper's BibTeX entry, shown by the losses' ``citation`` property (and so in model cards)."""

from __future__ import annotations

CODIEMB_CITATION = """
@misc{zhang2025codiemb,
    title={CoDiEmb: A Collaborative yet Distinct Framework for Unified Representation Learning in Information Retrieval and Semantic Textual Similarity},
    author={Zhang, Bowen and Song, Zixin and Chen, Chunquan and Zhang, Qian-Wen and Yin, Di and Sun, Xing},
    year={2025},
    eprint={2508.11442},
    archivePrefix={arXiv},
    primaryClass={cs.CL},
    url={https://arxiv.org/abs/2508.11442},
}
"""
