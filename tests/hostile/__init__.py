"""Tests for the findings of the security and reliability audit: each failed before its fix."""
