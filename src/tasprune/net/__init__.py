"""The description of a network: its layer plan (`plan`), traced from any module
(`trace`), cut to a pruned shape (`surgery`), its channels ranked and reordered
(`importance`)."""
