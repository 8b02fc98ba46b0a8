// ws ships no types; the check only needs it to exist.
declare module 'ws';
