"""VLsI distillation (see shared/VLSI_METHOD.md), one module per concept.

- `adapters`: where a decoder VLM keeps its layers, norm and head; hidden states by hooks.
- `verbalizer`: verb-FFNs, target-layer selection, saving them beside a checkpoint.
- `losses`: chunked, recomputed divergences between verbalized distributions.
- `matching`: adaptive order-preserving layer matching, its ablations, the match recorder.
- `teacher_cache`: precomputed top-k teacher distributions on disk.
- `config`: `vlsi distill`'s YAML as dataclasses, and the output layout.
- `verbalization`: step 1 (its trainer objective and `run_verbalize`).
- `interaction`: step 2 (its objective, the teacher cache's use and `run_interact`).
- `sft_step`: step 3 (`run_sft`).
- `steps_common`: what the steps share (loading, trainable weights, publishing outputs).
- `pipeline`: the three steps end to end, in order, resumable (`vlsi distill`).

Submodules are imported explicitly (`from vlsi_model.distill.losses import ...`) so that
importing this package stays cheap.
"""
