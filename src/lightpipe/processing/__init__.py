"""Preprocessing: text, audio and image inputs -> model features."""
