"""Everything that makes or reads data: robot bags, question sets, teacher labels."""
