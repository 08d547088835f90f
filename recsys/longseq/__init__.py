"""Long behaviour sequences at linear cost: VQ long-term memory and search-based selection
(see ``docs/long_sequences.md``)."""
