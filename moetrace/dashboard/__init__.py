"""moetrace.dashboard"""
