"""Test harness shared by every stage's tests: loopback servers, local Ray, URL lists."""
