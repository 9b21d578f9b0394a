"""Every training data source, each ending as cached tensors (``tensors.LCDData``) or rendered images:
``shapes`` (the procedural world), ``folders`` (a user's image-caption folder)."""
