"""Optional stack components: experiment trackers, data validators and the interface they share."""
