"""cluster/engine/models"""
