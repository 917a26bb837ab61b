"""What a user asks for: scene files, their canvas and masks, model presets."""
