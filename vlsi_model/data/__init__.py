"""Everything that makes or reads data, one module per concept.

- Synthetic scenes: `scenes` (the seeded scene model), `render` (pixels), `question_families`
  (questions with exact answers), `scene_dataset` (ground-truth records, the dataset writer),
  `open_answers` (answers with many valid forms).
- Files: `llava` (LLaVA conversation JSON: reading, validation).
- The robot's own frames: `bags` (the bag reader), `from_bag` (bag -> unlabelled dataset),
  `questions` (question files and families for unlabelled frames).
- Teacher labels: `labelling` (a local model or an engine answers), `endpoint_teacher` (an
  OpenAI-compatible server answers).
"""
