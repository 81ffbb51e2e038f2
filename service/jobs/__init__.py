"""What every kind of job shares in the API: its record's common fields, and its routes (get,
list, cancel, events). A kind of job adds its own fields, its create and its work."""
