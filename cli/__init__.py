"""The quest-export command tree (click). It only builds a recipe and calls quest_export.pipeline."""
