#!/usr/bin/env python3
"""Fails when an `unsafe` block or impl has no `// SAFETY:` comment in the four lines above it."""
import sys,re,glob
bad=0
for f in glob.glob('src/**/*.rs',recursive=True)+glob.glob('tests/**/*.rs',recursive=True):
    lines=open(f).read().split('\n')
    for i,l in enumerate(lines):
        if re.search(r'unsafe\s*\{|unsafe impl',l) and not l.strip().startswith('//'):
            ctx='\n'.join(lines[max(0,i-4):i+1])
            if 'SAFETY' not in ctx:
                print(f"{f}:{i+1}: {l.strip()}"); bad+=1
sys.exit(1 if bad else 0)
