"""Scores of an explanation map: localisation (free, from map and boxes) and faithfulness (costs forwards)."""
