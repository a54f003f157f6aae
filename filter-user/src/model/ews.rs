//! EWS's vocabulary as ewsgate's rules speak it: data types, operation classes, and the
//! catalogue of operations with the class and data type each one has.

use std::fmt;

/// A set of data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct DataSet(u8);

impl DataSet {
    pub const NONE: DataSet = DataSet(0);
    pub const EMAIL: DataSet = DataSet(1);
    pub const CALENDAR: DataSet = DataSet(2);
    pub const CONTACTS: DataSet = DataSet(4);
    pub const TASKS: DataSet = DataSet(8);
    pub const NOTES: DataSet = DataSet(16);
    pub const ALL: DataSet = DataSet(31);
    pub const NAMES: [(&'static str, DataSet); 5] = [
        ("email", DataSet::EMAIL),
        ("calendar", DataSet::CALENDAR),
        ("contacts", DataSet::CONTACTS),
        ("tasks", DataSet::TASKS),
        ("notes", DataSet::NOTES),
    ];

    pub fn parse(name: &str) -> Option<DataSet> {
        DataSet::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
    }

    pub fn union(self, other: DataSet) -> DataSet {
        DataSet(self.0 | other.0)
    }

    pub fn within(self, other: DataSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn intersects(self, other: DataSet) -> bool {
        self.0 & other.0 != 0
    }

    pub fn without(self, other: DataSet) -> DataSet {
        DataSet(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for DataSet {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = DataSet::NAMES
            .iter()
            .filter(|(_, d)| !d.within(DataSet(!self.0)))
            .map(|(n, _)| *n)
            .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// Operation classes a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Send,
    Sync,
    /// The classes below are never granted by default: a rule must name them, or the
    /// operation itself.
    Export,
    Ediscovery,
    Delegates,
    InboxRules,
    Apps,
}

impl OpClass {
    pub const ALL: [(&'static str, OpClass); 9] = [
        ("read", OpClass::Read),
        ("write", OpClass::Write),
        ("send", OpClass::Send),
        ("sync", OpClass::Sync),
        ("export", OpClass::Export),
        ("ediscovery", OpClass::Ediscovery),
        ("delegates", OpClass::Delegates),
        ("inbox-rules", OpClass::InboxRules),
        ("apps", OpClass::Apps),
    ];

    pub fn parse(name: &str) -> Option<OpClass> {
        OpClass::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }

    /// Reachable only through a rule that names it.
    pub fn restricted(self) -> bool {
        !matches!(
            self,
            OpClass::Read | OpClass::Write | OpClass::Send | OpClass::Sync
        )
    }
}

/// What ewsgate knows of an operation.
#[derive(Debug, Clone, Copy)]
pub struct OpInfo {
    /// The operation's name as EWS spells it.
    pub name: &'static str,
    pub class: OpClass,
    /// The data type the operation is about whatever its arguments.
    pub data: Option<DataSet>,
    pub shape: Shape,
}

/// How an operation's data type shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Its arguments (folders, item IDs) decide; the response shows the items' classes.
    Items,
    /// Like `Items`, but it changes the store: an unresolved type cannot wait for the
    /// response, and the IDs it names are forgotten.
    Changes,
    /// Folder metadata: distinguished folders decide; roots are neutral.
    Folders,
    /// Like `Folders`, and the answer lists folders: under a rule with data types, each is
    /// judged by its class, and its ID learnt.
    FolderList,
    /// Only the operation's own `data`.
    Fixed,
}

impl Shape {
    /// Folder metadata, not items.
    pub fn folders(self) -> bool {
        matches!(self, Shape::Folders | Shape::FolderList)
    }
}

const E: DataSet = DataSet::EMAIL;
const C: DataSet = DataSet::CALENDAR;
const P: DataSet = DataSet::CONTACTS;
const CT: DataSet = DataSet(2 | 8);

/// The EWS operations ewsgate knows; any other is denied unless a rule names it.
const OPERATIONS: &[(&str, OpClass, Option<DataSet>, Shape)] = {
    use OpClass::*;
    use Shape::*;
    &[
        ("GetItem", Read, None, Items),
        ("FindItem", Read, None, Items),
        ("GetAttachment", Read, None, Items),
        ("SyncFolderItems", Sync, None, Items),
        ("GetConversationItems", Read, Some(E), Items),
        ("FindConversation", Read, Some(E), Fixed),
        ("GetFolder", Read, None, FolderList),
        ("FindFolder", Read, None, FolderList),
        ("SyncFolderHierarchy", Sync, None, FolderList),
        ("Subscribe", Sync, None, Folders),
        ("GetEvents", Sync, None, Fixed),
        ("GetStreamingEvents", Sync, None, Fixed),
        ("Unsubscribe", Sync, None, Fixed),
        ("ConvertId", Read, None, Fixed),
        ("GetServerTimeZones", Read, None, Fixed),
        ("ResolveNames", Read, Some(P), Fixed),
        ("ExpandDL", Read, Some(P), Fixed),
        ("FindPeople", Read, Some(P), Fixed),
        ("GetPersona", Read, Some(P), Fixed),
        ("GetUserPhoto", Read, Some(P), Fixed),
        ("GetUserAvailability", Read, Some(C), Fixed),
        ("GetRooms", Read, Some(C), Fixed),
        ("GetRoomLists", Read, Some(C), Fixed),
        ("GetReminders", Read, Some(CT), Fixed),
        ("PerformReminderAction", Write, Some(CT), Fixed),
        ("GetMailTips", Read, Some(E), Fixed),
        ("GetUserOofSettings", Read, Some(E), Fixed),
        ("SetUserOofSettings", Write, Some(E), Fixed),
        ("MarkAllItemsAsRead", Write, Some(E), Fixed),
        ("ApplyConversationAction", Write, Some(E), Fixed),
        ("SendItem", Send, Some(E), Changes),
        ("CreateItem", Write, None, Changes),
        ("UpdateItem", Write, None, Changes),
        ("DeleteItem", Write, None, Changes),
        ("MoveItem", Write, None, Changes),
        ("CopyItem", Write, None, Changes),
        ("ArchiveItem", Write, None, Changes),
        ("MarkAsJunk", Write, Some(E), Changes),
        ("CreateAttachment", Write, None, Changes),
        ("DeleteAttachment", Write, None, Changes),
        ("CreateFolder", Write, None, Folders),
        ("CreateFolderPath", Write, None, Folders),
        ("UpdateFolder", Write, None, Folders),
        ("DeleteFolder", Write, None, Changes),
        ("EmptyFolder", Write, None, Changes),
        ("MoveFolder", Write, None, Changes),
        ("CopyFolder", Write, None, Changes),
        ("ExportItems", Export, None, Changes),
        ("UploadItems", Export, None, Changes),
        ("GetSearchableMailboxes", Ediscovery, None, Fixed),
        ("SearchMailboxes", Ediscovery, None, Fixed),
        ("GetDiscoverySearchConfiguration", Ediscovery, None, Fixed),
        ("GetHoldOnMailboxes", Ediscovery, None, Fixed),
        ("SetHoldOnMailboxes", Ediscovery, None, Fixed),
        ("GetNonIndexableItemDetails", Ediscovery, None, Fixed),
        ("GetNonIndexableItemStatistics", Ediscovery, None, Fixed),
        ("AddDelegate", Delegates, None, Fixed),
        ("GetDelegate", Delegates, None, Fixed),
        ("UpdateDelegate", Delegates, None, Fixed),
        ("RemoveDelegate", Delegates, None, Fixed),
        ("GetInboxRules", InboxRules, Some(E), Fixed),
        ("UpdateInboxRules", InboxRules, Some(E), Fixed),
        ("GetAppManifests", Apps, None, Fixed),
        ("GetAppMarketplaceUrl", Apps, None, Fixed),
        ("InstallApp", Apps, None, Fixed),
        ("UninstallApp", Apps, None, Fixed),
        ("DisableApp", Apps, None, Fixed),
        ("GetClientAccessToken", Apps, None, Fixed),
    ]
};

pub fn operation(name: &str) -> Option<OpInfo> {
    OPERATIONS
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|&(name, class, data, shape)| OpInfo {
            name,
            class,
            data,
            shape,
        })
}

pub fn is_operation(name: &str) -> bool {
    operation(name).is_some()
}

/// Meeting requests and responses: calendar data that lives in the Inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meetings(pub DataSet);

impl Default for Meetings {
    fn default() -> Self {
        Meetings(DataSet::CALENDAR)
    }
}
