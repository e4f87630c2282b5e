"""Live migration: device-state save/restore, dirty tracking, pre-copy orchestration."""
