"""Tests of the hand-off to other engines."""
