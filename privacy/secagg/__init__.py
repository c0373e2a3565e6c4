"""consortia.privacy.secagg"""
