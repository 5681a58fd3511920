"""Queue names. Heavy work has its own queue served by its own workers; periodic jobs go to background."""

DEFAULT = "default"
HEAVY = "heavy"
BACKGROUND = "background"
ALL = (DEFAULT, HEAVY, BACKGROUND)
