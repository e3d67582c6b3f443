"""VLsI distillation (see shared/VLSI_METHOD.md), one module per concept.

- `adapters`: where a decoder VLM keeps its layers, norm and head; hidden states by hooks.
- `verbalizer`: verb-FFNs, target-layer selection, saving them beside a checkpoint.
- `losses`: chunked, recomputed divergences between verbalized distributions.
- `matching`: adaptive order-preserving layer matching, its ablations, the match recorder.
- `teacher_cache`: precomputed top-k teacher distributions on disk.
- `objectives`: the verbalization and interaction steps as trainer objectives.
- `pipeline`: the three steps end to end (`vlsi distill`).

Submodules are imported explicitly (`from vlsi_model.distill.losses import ...`) so that
importing this package stays cheap.
"""
