"""Step 1 of the loop: generation behind one interface, collated into a RolloutBatch."""
